(g "smollm2-135m"
   (cross (system "Answer the question using the documents. Be brief.")
          (plus (user "Document: The Eiffel Tower is in Paris. It was completed in 1889 for the World's Fair.")
                (user "Document: The Colosseum is in Rome. It is an ancient amphitheatre built of concrete and sand."))
          (user "In which year was the Eiffel Tower completed?"))
   48 0.0)
